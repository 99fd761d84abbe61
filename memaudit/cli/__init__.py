"""The typer command-line interface: one module per subcommand, parsing and printing only."""
