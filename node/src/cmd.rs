//! One module per subcommand.

pub mod admin;
pub mod bench;
pub mod generate;
pub mod health;
pub mod load;
pub mod node;
pub mod up;
