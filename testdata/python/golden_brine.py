"""Golden brine vectors from the real rpyc package, for the Rust brine codec tests.

    golden_brine.py               prints `<name>\t<hex of rpyc.core.brine.dump(value)>` per line
    golden_brine.py --decode HEX  prints repr(rpyc.core.brine.load(bytes.fromhex(HEX)))

The first form covers every brine tag (see VALUES); the second lets a Rust test ask the real
package how it decodes bytes the Rust encoder produced. --decode exits with status 1 and a
message on stderr if the bytes do not decode, or if they decode with bytes left over.
"""

import argparse
import io
import sys

from rpyc.core import brine

# (stable name, value): the names are what the Rust tests look up; never rename one.
VALUES = [
    ("none", None),
    ("true", True),
    ("false", False),
    ("not_implemented", NotImplemented),
    ("ellipsis", Ellipsis),
    # Immediate ints are -48..159; the rest are ASCII decimal (INT_L1, INT_L4 past 255 digits).
    ("int_0", 0),
    ("int_1", 1),
    ("int_minus_1", -1),
    ("int_minus_48", -48),
    ("int_159", 159),
    ("int_minus_49", -49),
    ("int_160", 160),
    ("int_1000", 1000),
    ("int_2_pow_62", 2**62),
    ("int_2_pow_63", 2**63),
    ("int_2_pow_64", 2**64),
    ("int_minus_2_pow_63", -(2**63)),
    ("int_minus_2_pow_100", -(2**100)),
    ("int_10_pow_300", 10**300),
    ("float_1_5", 1.5),
    ("float_minus_0", -0.0),
    ("float_inf", float("inf")),
    ("complex_1_minus_2", complex(1, -2)),
    # bytes: EMPTY_STR, STR1..STR4, STR_L1, STR_L4
    ("bytes_empty", b""),
    ("bytes_1", b"y"),
    ("bytes_4", b"abcd"),
    ("bytes_5", b"abcde"),
    ("bytes_300_zero", b"\x00" * 300),
    # str: UNICODE around a nested bytes value holding UTF-8
    ("str_empty", ""),
    ("str_x", "x"),
    ("str_e_acute", "\u00e9"),
    ("str_hello", "hello"),
    ("str_300", "a" * 300),
    # tuples: EMPTY_TUPLE, TUP1..TUP4, TUP_L1, TUP_L4
    ("tuple_empty", ()),
    ("tuple_1", (1,)),
    ("tuple_2", (1, 2)),
    ("tuple_3", (1, 2, 3)),
    ("tuple_4", (1, 2, 3, 4)),
    ("tuple_5", tuple(range(5))),
    ("tuple_300", tuple(range(300))),
    ("tuple_nested", ((1, "a"), (b"b", None))),
    ("frozenset_empty", frozenset()),
    ("frozenset_1", frozenset({1})),
    ("slice_1_2_3", slice(1, 2, 3)),
    ("slice_none_5_none", slice(None, 5, None)),
]


def dump_all(out):
    names = set()
    for name, value in VALUES:
        assert name not in names, f"duplicate name {name}"
        names.add(name)
        out.write(f"{name}\t{brine.dump(value).hex()}\n")


def decode(hex_text):
    data = bytes.fromhex(hex_text)
    # brine.load(data) is _load(BytesIO(data)) and ignores trailing bytes: read through a
    # stream of our own to see them. (Like brine.load, this does not notice truncated data.)
    stream = io.BytesIO(data)
    try:
        value = brine._load(stream)
    except Exception as e:  # the real decoder's own error, whatever it is
        sys.exit(f"brine.load failed: {type(e).__name__}: {e}")
    rest = stream.read()
    if rest:
        sys.exit(f"brine.load left {len(rest)} bytes undecoded: {rest.hex()}")
    print(repr(value))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode", metavar="HEX", help="decode these brine bytes instead")
    args = parser.parse_args()
    if args.decode is not None:
        decode(args.decode)
    else:
        dump_all(sys.stdout)


if __name__ == "__main__":
    main()
