"""Paper reproduction: a paper's headline table and its claim card, from one YAML file."""
