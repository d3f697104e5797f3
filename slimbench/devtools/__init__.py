"""The project's own developer tools: the method contract, the scaffold, verify, and the benches."""
