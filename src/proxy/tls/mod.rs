//! mTLS between nodes (issue 17, in progress): node identities read from
//! certificates and matched against `allow` lists.

pub mod identity;
