fn main() {
    std::process::exit(usernet::cli::main());
}
