"""`python -m chalicelib.rotation rotate|resume|status`: the webhook secret rotation command.
The code is `chalicelib.secrets.rotation`; this module is only its documented entry point."""

import sys

from chalicelib.secrets.rotation import main

if __name__ == "__main__":
    sys.exit(main())
