"""Bad input over a real server (issue 6): drawn storms, a catalogue of known bad inputs, malformed model files."""
