//! CIDR networks for `trusted_proxies`: the engine owns the type, since it resolves client
//! addresses with it.

pub use engine::Cidr;
