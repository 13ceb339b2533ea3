pytest_plugins = ["tests.s3server", "tests.models", "tests.jobs"]
