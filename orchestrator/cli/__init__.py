"""The `mmpt` command line: thin typer commands, the consoles and the one error exit."""
