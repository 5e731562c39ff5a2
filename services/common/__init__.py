"""What every Mirador service shares: config, server bootstrap, errors, logging
and the generated stubs (`mirador.v1`). Imports no service."""
