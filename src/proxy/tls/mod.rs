//! mTLS between nodes (issue 17, in progress): node identities read from
//! certificates and matched against `allow` lists; the node's credentials
//! from files and the rustls configurations made from them.

pub mod credentials;
pub mod identity;

pub use credentials::{CredentialFiles, Credentials, CredentialsError, Loaded};
pub use identity::NodeIdentity;
