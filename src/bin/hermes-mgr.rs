fn main() -> std::process::ExitCode {
    hermes_mgr::cli::main()
}
