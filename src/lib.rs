//! wxrelay: a relay for WeChat Official Account server pushes.

pub mod config;
pub mod route;
pub mod spool;
pub mod wechat;
