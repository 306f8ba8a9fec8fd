"""Coverage-guided fuzz targets (atheris): ``python -m tests.fuzz.<target> [libFuzzer flags] [corpus dirs]``."""
