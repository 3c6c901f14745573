"""The recipes `mergemix train -c NAME` finds by name (installed as the package mergemix.configs)."""
