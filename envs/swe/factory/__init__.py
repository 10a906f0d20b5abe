"""SWE task factory inputs: a real PyPI library as a clean git repository and a Docker image to test it in.

`sources` turns `NAME[==VERSION]` into a cached sdist and a one-commit repository (reproducible sha);
`known_libraries` holds the few per-library test tweaks and the default test command and dependencies;
`library_image` builds the offline image (repo seed + /opt/venv with the test dependencies); `baseline`
runs a test command in that image and parses the log with SWE-bench's pytest parser.
"""
