"""One module per command group; each translates options into a config and calls one library function."""
