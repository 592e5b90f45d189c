import sys
from pathlib import Path

# The contract suite and helpers live beside the tests as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
