"""The run folder: its layout and files (folder.py), its status, and its JSONL logs read by
column. Training writes it; the run tools (kiln.runs) read it."""
