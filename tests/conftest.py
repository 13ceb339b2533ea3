pytest_plugins = ["tests.s3server", "tests.models", "tests.jobs", "tests.eval_fixtures"]
