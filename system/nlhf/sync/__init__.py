"""nlhf.sync"""
