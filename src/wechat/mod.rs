//! The WeChat Official Account server-URL protocol: signatures, the AES frame,
//! the XML of pushes and replies. Everything here is pure: no I/O, no clock.

pub mod crypto;
pub mod message;
pub mod push;
pub mod reply;
pub mod signature;
