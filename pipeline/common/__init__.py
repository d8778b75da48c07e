"""Ground floor: helpers every layer may import (files, fault points). Imports nothing else from pipeline."""
