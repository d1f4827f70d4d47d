"""Converters that write RecBole atomic files: the Amazon 2018 review dumps and the bundled amazon-scientific."""
