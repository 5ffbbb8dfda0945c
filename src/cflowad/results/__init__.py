"""What comes out: metrics with the MVTec AD conventions, pictures, the test report
and the demo. Imports the layers below, never the line, fleets or the CLI.

The package map and what each package may import: docs/architecture.md.
"""
