"""Data: the bundled books (corpora.py), strict file reading (sources.py), long text for continued pre-training
(text.py), conversations for fine-tuning (instructions.py) in their record formats and chat template (formats.py),
and PoSE's skipping position ids (pose.py). The public-domain books themselves ship in this folder."""
