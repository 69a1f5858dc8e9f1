//! A check that a command line documents itself: the agent's, and the
//! tools' built beside it, each test theirs with [`undocumented`].

/// Every subcommand and argument of `cmd`, its own included, that has no
/// help text, as `lb-agent backend add <address>`.
pub fn undocumented(cmd: &clap::Command) -> Vec<String> {
    let mut missing = Vec::new();
    let mut todo = vec![(cmd.get_name().to_owned(), cmd.clone())];
    while let Some((path, cmd)) = todo.pop() {
        if cmd.get_about().is_none() && cmd.get_long_about().is_none() {
            missing.push(path.clone());
        }
        let args = cmd.get_arguments().filter(|a| a.get_help().is_none() && a.get_long_help().is_none());
        missing.extend(args.map(|a| format!("{path} <{}>", a.get_id())));
        todo.extend(cmd.get_subcommands().map(|c| (format!("{path} {}", c.get_name()), c.clone())));
    }
    missing
}

/// Panics, naming each, if anything in `cmd` lacks help text: for a test.
pub fn assert_documented(cmd: &clap::Command) {
    let missing = undocumented(cmd);
    assert!(missing.is_empty(), "no help text: {missing:#?}");
}
