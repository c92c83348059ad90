"""Command-line layer: parse, call one library function, render the result."""
