"""nlhf.data"""
