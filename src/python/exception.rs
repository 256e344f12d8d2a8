//! Python exceptions as [`PythonError`]: building one to raise in a Python caller, and reading
//! the arguments and attributes of one a Python peer raised.

use crate::error::{Error, PythonError};
use crate::python::value::{PyArgs, Value};
use std::sync::Arc;

/// Arguments and attributes (the part of a [`PythonError`] made of [`Value`]s).
struct Data {
    args: Vec<Value>,
    attrs: Vec<(String, Value)>,
}

impl PythonError {
    /// An exception of Python's own class `class` (module `builtins`: `ValueError`,
    /// `KeyError`, `TypeError`, `RuntimeError`, ...), to return from a handler so that the
    /// Python caller gets exactly that exception. `args` is a tuple of values, as in
    /// `ValueError("bad value", 42)`.
    ///
    /// ```
    /// let e = rpyc::PythonError::new("KeyError", ("missing",));
    /// assert!(e.is("KeyError"));
    /// assert_eq!(e.args(), &[rpyc::python::Value::from("missing")]);
    /// ```
    pub fn new(class: &str, args: impl PyArgs) -> PythonError {
        let args = args
            .into_args()
            .unwrap_or_else(|e| vec![Value::Str(e.to_string())]);
        Self::received(
            "builtins".into(),
            class.into(),
            args,
            Vec::new(),
            String::new(),
        )
    }

    /// The same exception with its class in another module (`mylib.DeviceError`). Python
    /// raises classes outside `builtins` as a generic `module.Class` exception unless it is
    /// configured to import them.
    ///
    /// ```
    /// let e = rpyc::PythonError::new("DeviceError", ("offline",)).in_module("lab");
    /// assert_eq!(e.qualified_name(), "lab.DeviceError");
    /// ```
    pub fn in_module(mut self, module: &str) -> PythonError {
        self.module = module.into();
        self
    }

    /// The same exception with `text` as its traceback (Python shows it under "Remote
    /// Traceback").
    ///
    /// ```
    /// let e = rpyc::PythonError::new("ValueError", ("x",)).with_traceback("in handler add");
    /// assert_eq!(e.traceback(), "in handler add");
    /// ```
    pub fn with_traceback(mut self, text: impl Into<String>) -> PythonError {
        self.traceback = text.into();
        self
    }

    /// The exception's arguments (Python's `exc.args`; arguments that were not plain values
    /// arrive as their `repr()` strings).
    ///
    /// ```
    /// let e = rpyc::PythonError::new("ValueError", ("bad", 42));
    /// assert_eq!(e.args()[1], rpyc::python::Value::Int(42));
    /// ```
    pub fn args(&self) -> &[Value] {
        self.data
            .downcast_ref::<Data>()
            .map(|d| &d.args[..])
            .unwrap_or(&[])
    }

    /// The exception's public attributes as the peer sent them (`errno`, `filename`, ...),
    /// without RPyC's own `_remote_version`.
    ///
    /// ```
    /// assert!(rpyc::PythonError::new("ValueError", ()).attrs().is_empty());
    /// ```
    pub fn attrs(&self) -> &[(String, Value)] {
        self.data
            .downcast_ref::<Data>()
            .map(|d| &d.attrs[..])
            .unwrap_or(&[])
    }

    /// The RPyC version of the peer that raised it, if the peer tells (RPyC 6 peers send it
    /// with every exception unless configured not to).
    ///
    /// ```
    /// assert_eq!(rpyc::PythonError::new("ValueError", ()).remote_version(), None);
    /// ```
    pub fn remote_version(&self) -> Option<&str> {
        self.attrs()
            .iter()
            .find_map(|(k, v)| match (k.as_str(), v) {
                ("_remote_version", Value::Str(s)) => Some(s.as_str()),
                _ => None,
            })
    }

    /// An exception as a peer sent it (or as `new` builds one).
    pub(crate) fn received(
        module: String,
        class: String,
        args: Vec<Value>,
        attrs: Vec<(String, Value)>,
        traceback: String,
    ) -> PythonError {
        let message = match &args[..] {
            [] => String::new(),
            [Value::Str(s)] => s.clone(),
            [one] => format!("{one:?}"),
            many => format!("{:?}", Value::Tuple(many.to_vec())),
        };
        PythonError {
            module,
            class,
            message,
            traceback,
            data: Arc::new(Data { args, attrs }),
        }
    }
}

/// Lets a handler use `?` on this crate's calls: a Python exception travels on as itself,
/// anything else as a `RuntimeError` saying what failed.
impl From<Error> for PythonError {
    fn from(e: Error) -> PythonError {
        match e {
            Error::Python(p) => p,
            other => PythonError::new("RuntimeError", (other.to_string(),)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_what_python_str_gives() {
        assert_eq!(PythonError::new("ValueError", ()).message(), "");
        assert_eq!(PythonError::new("ValueError", ("x",)).message(), "x");
        assert_eq!(PythonError::new("KeyError", (7,)).message(), "7");
        assert_eq!(PythonError::new("E", ("a", 1)).message(), "(\"a\", 1)");
    }
}
