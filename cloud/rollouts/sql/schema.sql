-- the rollouts tables (see migrations)
SELECT 1;
