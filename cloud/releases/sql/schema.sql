-- the releases tables (see migrations)
SELECT 1;
