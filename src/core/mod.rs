//! The connection core: one symmetric channel between two peers ([`connection`]), who reads it
//! and who runs the peer's requests ([`dispatch`]), remote objects and their reference counting
//! ([`object`]), and services with the context of a call ([`service`]).

pub(crate) mod config;
pub(crate) mod connection;
pub(crate) mod context;
pub(crate) mod dispatch;
pub(crate) mod flush;
pub(crate) mod object;
pub(crate) mod service;

#[cfg(test)]
mod tests;
