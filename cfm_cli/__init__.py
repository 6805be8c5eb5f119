"""The `cfm` command line: `main` builds the parser from one module per command group; `common` holds the
flags they share and turns them into the library's typed options."""
