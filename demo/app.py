"""The MambaOut web demo as a script (the Hugging Face Space layout): `python demo/app.py`.

The app itself is `mambaout.inference.demo_app` so that `mambaout demo` works from a pip install; options as there
(`python demo/app.py --checkpoint best.safetensors --port 7861`).
"""

import sys

from mambaout.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
