def after_training(checkpoint_path, config, logger):
    logger.info("evaluation: not yet implemented")
