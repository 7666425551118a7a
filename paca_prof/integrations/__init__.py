"""Integrations of paca_prof.profile() with training frameworks: transformers (HF Trainer, and
TRL's trainers, which are Trainers). Each imports its framework when it is imported itself."""
