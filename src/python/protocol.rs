//! RPyC 6's messages above the framing: `msg_type: u8 | brine((seq, body))`, the request
//! handlers, boxes and id packs, and exceptions ("vinegar"). Pure data: the connection
//! (`connection.rs`) owns the tables that boxes refer to.

use crate::error::PythonError;
use crate::python::brine;
use crate::python::frame;
use crate::python::value::Value;

pub const MSG_REQUEST: u8 = 1;
pub const MSG_REPLY: u8 = 2;
pub const MSG_EXCEPTION: u8 = 3;

pub const LABEL_VALUE: i64 = 1;
pub const LABEL_TUPLE: i64 = 2;
pub const LABEL_LOCAL_REF: i64 = 3;
pub const LABEL_REMOTE_REF: i64 = 4;

/// Request handlers, by the number RPyC gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    Ping = 1,
    Close = 2,
    GetRoot = 3,
    GetAttr = 4,
    DelAttr = 5,
    SetAttr = 6,
    Call = 7,
    CallAttr = 8,
    Repr = 9,
    Str = 10,
    Cmp = 11,
    Hash = 12,
    Dir = 13,
    Pickle = 14,
    Del = 15,
    Inspect = 16,
    BuffIter = 17,
    OldSlicing = 18,
    CtxExit = 19,
    InstanceCheck = 20,
}

impl Handler {
    pub fn from_id(id: i64) -> Option<Handler> {
        use Handler::*;
        const ALL: [Handler; 20] = [
            Ping,
            Close,
            GetRoot,
            GetAttr,
            DelAttr,
            SetAttr,
            Call,
            CallAttr,
            Repr,
            Str,
            Cmp,
            Hash,
            Dir,
            Pickle,
            Del,
            Inspect,
            BuffIter,
            OldSlicing,
            CtxExit,
            InstanceCheck,
        ];
        ALL.iter().copied().find(|h| *h as i64 == id)
    }

    pub fn name(self) -> &'static str {
        use Handler::*;
        match self {
            Ping => "PING",
            Close => "CLOSE",
            GetRoot => "GETROOT",
            GetAttr => "GETATTR",
            DelAttr => "DELATTR",
            SetAttr => "SETATTR",
            Call => "CALL",
            CallAttr => "CALLATTR",
            Repr => "REPR",
            Str => "STR",
            Cmp => "CMP",
            Hash => "HASH",
            Dir => "DIR",
            Pickle => "PICKLE",
            Del => "DEL",
            Inspect => "INSPECT",
            BuffIter => "BUFFITER",
            OldSlicing => "OLDSLICING",
            CtxExit => "CTXEXIT",
            InstanceCheck => "INSTANCECHECK",
        }
    }
}

/// An object's identity on the wire: `("module.Class", type id, instance id)`. The numbers are
/// the owner's business (CPython addresses on a Python peer); they are echoed back unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdPack {
    pub name: String,
    pub type_id: i128,
    pub instance: i128,
}

impl IdPack {
    pub fn to_value(&self) -> Value {
        Value::Tuple(vec![
            Value::Str(self.name.clone()),
            int(self.type_id),
            int(self.instance),
        ])
    }

    pub fn from_value(v: &Value) -> Result<IdPack, String> {
        let num = |v: &Value| -> Option<i128> {
            match v {
                Value::Int(i) => Some(*i as i128),
                Value::BigInt(s) => s.parse().ok(),
                _ => None,
            }
        };
        if let Value::Tuple(t) = v {
            if let [Value::Str(name), ty, inst] = &t[..] {
                if let (Some(type_id), Some(instance)) = (num(ty), num(inst)) {
                    return Ok(IdPack {
                        name: name.clone(),
                        type_id,
                        instance,
                    });
                }
            }
        }
        Err(format!(
            "not an id pack (name, type id, instance id): {}",
            crate::python::short(&format!("{v:?}"))
        ))
    }
}

fn int(i: i128) -> Value {
    match i64::try_from(i) {
        Ok(i) => Value::Int(i),
        Err(_) => Value::BigInt(i.to_string()),
    }
}

/// Starts a message in an open frame buffer ([`frame::open`]): its type byte and the head of
/// `(seq, body)`; the body is written next, then the buffer is sealed ([`frame::seal`]).
pub fn start(kind: u8, seq: u64) -> Vec<u8> {
    let mut out = frame::open();
    out.push(kind);
    brine::tuple_head(2, &mut out);
    match i64::try_from(seq) {
        Ok(s) => brine::int(s, &mut out),
        Err(_) => brine::dump(&Value::from(seq), &mut out).expect("an int is dumpable"),
    }
    out
}

/// A whole frame: type byte and brine `(seq, body)`.
pub fn message(kind: u8, seq: u64, body: &Value) -> Result<Vec<u8>, String> {
    let mut out = start(kind, seq);
    brine::dump(body, &mut out)?;
    Ok(frame::seal(out))
}

/// Splits a payload into its type byte, sequence number and body. Recognizes the envelopes of
/// older RPyC releases and of `RPYC_BIND_THREADS=true`, so a mismatch gets a clear message.
pub fn parse(payload: &[u8]) -> Result<(u8, u64, Value), String> {
    if let Some(why) = foreign_envelope(payload) {
        return Err(why);
    }
    let kind = payload[0];
    if !(MSG_REQUEST..=MSG_EXCEPTION).contains(&kind) {
        return Err(format!("unknown RPyC message type {kind}"));
    }
    let v = brine::load(&payload[1..])?;
    if let Value::Tuple(mut t) = v {
        if t.len() == 2 {
            let body = t.pop().expect("2 items");
            if let Value::Int(seq) = t[0] {
                if seq >= 0 {
                    return Ok((kind, seq as u64, body));
                }
            }
        }
    }
    Err("an RPyC message that is not (seq, body)".into())
}

/// Says what a payload is if it is not RPyC 6's envelope.
pub fn foreign_envelope(payload: &[u8]) -> Option<String> {
    if payload.is_empty() {
        return Some("an empty RPyC frame".into());
    }
    if payload[0] == 0x12 {
        return Some(
            "the peer speaks RPyC 4.1-5.x (its messages are brine (msg, seq, body) tuples); this \
             crate speaks RPyC 6: upgrade the peer with pip install 'rpyc>=6,<7'"
                .into(),
        );
    }
    if payload.len() >= 17 && payload[0] == 0 && (1..=3).contains(&payload[16]) {
        return Some(
            "the peer runs with RPYC_BIND_THREADS=true (each message carries 16 bytes of thread \
             ids), which this crate does not speak: start the peer without it"
                .into(),
        );
    }
    None
}

/// The exception body RPyC sends: `((module, class), args, attrs, traceback)`.
pub fn exception_body(e: &PythonError) -> Value {
    let args: Vec<Value> = e
        .args()
        .iter()
        .filter(|a| brine::dumpable(a))
        .cloned()
        .collect();
    Value::Tuple(vec![
        Value::Tuple(vec![
            Value::Str(e.module().into()),
            Value::Str(e.class().into()),
        ]),
        Value::Tuple(args),
        // "<version denied>" keeps Python from warning about a version mismatch.
        Value::Tuple(vec![Value::Tuple(vec![
            "_remote_version".into(),
            "<version denied>".into(),
        ])]),
        Value::Str(e.traceback().into()),
    ])
}

/// The exception a peer sent (`1` is RPyC's StopIteration).
pub fn exception_from(body: Value) -> Result<PythonError, String> {
    if body == Value::Int(1) {
        return Ok(PythonError::new("StopIteration", ()));
    }
    let bad = || {
        format!(
            "an RPyC exception that is not ((module, class), args, attrs, traceback): {}",
            crate::python::short(&format!("{body:?}"))
        )
    };
    let Value::Tuple(parts) = &body else {
        return Err(bad());
    };
    let [Value::Tuple(name), Value::Tuple(args), Value::Tuple(attrs), tb] = &parts[..] else {
        return Err(bad());
    };
    let [Value::Str(module), Value::Str(class)] = &name[..] else {
        return Err(bad());
    };
    let attrs = attrs
        .iter()
        .filter_map(|a| match a {
            Value::Tuple(kv) => match &kv[..] {
                [Value::Str(k), v] if k != "add_note" => Some((k.clone(), v.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let traceback = match tb {
        Value::Str(s) => s.clone(),
        _ => String::new(),
    };
    Ok(PythonError::received(
        module.clone(),
        class.clone(),
        args.clone(),
        attrs,
        traceback,
    ))
}
