"""The `mirador` command line: start the mesh, ask it things, check configs."""
