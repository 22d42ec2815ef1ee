"""offload-bench: a benchmark and regression harness for the memory-offload flags of DiT inference."""

from pathlib import Path

# The checkout the package runs from: scenarios/, results/ and the cell children's working directory. One place,
# so a module's depth in the package never changes what it points at.
REPO = Path(__file__).resolve().parent.parent
