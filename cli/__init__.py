"""The ``renderfarm`` command line: run the farm, submit jobs, follow and download them."""
