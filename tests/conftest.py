pytest_plugins = ["tests.models"]
