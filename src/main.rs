//! The `restpipe` command.

fn main() {
    println!("restpipe");
}
