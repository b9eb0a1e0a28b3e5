//! Helpers shared by test files (`mod common;`). Each test crate compiles
//! this module separately.

pub mod load;
