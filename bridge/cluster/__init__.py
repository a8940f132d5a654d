"""The cluster: several bridge processes or machines sharing one Redis (issue 13). Needs the `cluster` extra."""
