"""nlhf.telemetry"""
