"""Prompts for Ideogram 4: the JSON caption schema (`caption`) and optional local upsampling (`upsample`)."""
