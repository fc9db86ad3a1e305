"""nlhf.judge"""
