-- xnatmigrate plan <id>
-- manifest:  <tmp>/manifest.yaml (sha256 <digest>)
-- created:   2024-02-29T23:59:59
-- sessions:  3 prearchive row(s) to insert
-- table:     xdat_search.prearchive, profile not checked ?offline?
--
-- These are exactly the statements `xnatmigrate apply` executes (there with bind parameters).
-- Each INSERT is guarded: running this script twice inserts nothing the second time.
-- Run:  psql -v ON_ERROR_STOP=1 -f plan.sql "<dsn>"
-- NOTE: insert a row only after its session folder is in the prearchive; `apply` does both in order.
SET standard_conforming_strings = on;
SET client_encoding = 'UTF8';
BEGIN;

-- /prearchive/projects/prj001/20240229_235959999/PAT001_20210924_CT  study 2.25.269933113664123046255495623173065191599
SELECT pg_advisory_xact_lock(-3974933209280026141);
INSERT INTO xdat_search.prearchive (project, timestamp, lastmod, uploaded, scan_date, scan_time, subject, foldername, name, tag, status, url, autoarchive, prevent_anon, prevent_auto_commit, source, visit, protocol, timezone)
SELECT
CAST('prj001' AS varchar),
CAST('20240229_235959999' AS varchar),
CAST(now() AT TIME ZONE 'Europe/Berlin' AS timestamp),
CAST('2024-02-29 23:59:59.999' AS timestamp),
CAST('2021-09-24 11:48:16' AS timestamp),
CAST('11:48:16' AS varchar),
CAST('GARCIA_ELENA' AS varchar),
CAST('PAT001_20210924_CT' AS varchar),
CAST('PAT001_20210924_CT' AS varchar),
CAST('2.25.269933113664123046255495623173065191599' AS varchar),
CAST('RECEIVING' AS varchar),
CAST('/data/xnat/prearchive/prj001/20240229_235959999/PAT001_20210924_CT' AS varchar),
CAST('Manual' AS varchar),
CAST(false AS boolean),
CAST(true AS boolean),
CAST('xnatmigrate' AS varchar),
CAST(NULL AS varchar),
CAST(NULL AS varchar),
CAST(NULL AS varchar)
WHERE NOT EXISTS (
    SELECT 1 FROM xdat_search.prearchive
    WHERE timestamp = '20240229_235959999'
      AND foldername = 'PAT001_20210924_CT'
      AND project IS NOT DISTINCT FROM 'prj001')
  AND NOT EXISTS (
    SELECT 1 FROM xdat_search.prearchive
    WHERE project IS NOT DISTINCT FROM 'prj001'
      AND tag = '2.25.269933113664123046255495623173065191599'
      AND name = 'PAT001_20210924_CT');

-- /prearchive/projects/prj001/20240301_000000000/PAT002_20160209_CT  study 2.25.188672109241766683606586658615395721466
SELECT pg_advisory_xact_lock(-5997556926692468436);
INSERT INTO xdat_search.prearchive (project, timestamp, lastmod, uploaded, scan_date, scan_time, subject, foldername, name, tag, status, url, autoarchive, prevent_anon, prevent_auto_commit, source, visit, protocol, timezone)
SELECT
CAST('prj001' AS varchar),
CAST('20240301_000000000' AS varchar),
CAST(now() AT TIME ZONE 'Europe/Berlin' AS timestamp),
CAST('2024-03-01 00:00:00.000' AS timestamp),
CAST('2016-02-09 13:26:47' AS timestamp),
CAST('13:26:47' AS varchar),
CAST('MUELLER_LUCAS' AS varchar),
CAST('PAT002_20160209_CT' AS varchar),
CAST('PAT002_20160209_CT' AS varchar),
CAST('2.25.188672109241766683606586658615395721466' AS varchar),
CAST('RECEIVING' AS varchar),
CAST('/data/xnat/prearchive/prj001/20240301_000000000/PAT002_20160209_CT' AS varchar),
CAST('Manual' AS varchar),
CAST(false AS boolean),
CAST(true AS boolean),
CAST('xnatmigrate' AS varchar),
CAST(NULL AS varchar),
CAST(NULL AS varchar),
CAST(NULL AS varchar)
WHERE NOT EXISTS (
    SELECT 1 FROM xdat_search.prearchive
    WHERE timestamp = '20240301_000000000'
      AND foldername = 'PAT002_20160209_CT'
      AND project IS NOT DISTINCT FROM 'prj001')
  AND NOT EXISTS (
    SELECT 1 FROM xdat_search.prearchive
    WHERE project IS NOT DISTINCT FROM 'prj001'
      AND tag = '2.25.188672109241766683606586658615395721466'
      AND name = 'PAT002_20160209_CT');

-- /prearchive/projects/prj001/20240301_000000001/PAT002_20221003_MR  study 2.25.274211555748246625924881240087185146790
SELECT pg_advisory_xact_lock(-350792889035639538);
INSERT INTO xdat_search.prearchive (project, timestamp, lastmod, uploaded, scan_date, scan_time, subject, foldername, name, tag, status, url, autoarchive, prevent_anon, prevent_auto_commit, source, visit, protocol, timezone)
SELECT
CAST('prj001' AS varchar),
CAST('20240301_000000001' AS varchar),
CAST(now() AT TIME ZONE 'Europe/Berlin' AS timestamp),
CAST('2024-03-01 00:00:00.001' AS timestamp),
CAST('2022-10-03 18:00:33' AS timestamp),
CAST('18:00:33' AS varchar),
CAST('MUELLER_LUCAS' AS varchar),
CAST('PAT002_20221003_MR' AS varchar),
CAST('PAT002_20221003_MR' AS varchar),
CAST('2.25.274211555748246625924881240087185146790' AS varchar),
CAST('RECEIVING' AS varchar),
CAST('/data/xnat/prearchive/prj001/20240301_000000001/PAT002_20221003_MR' AS varchar),
CAST('Manual' AS varchar),
CAST(false AS boolean),
CAST(true AS boolean),
CAST('xnatmigrate' AS varchar),
CAST(NULL AS varchar),
CAST(NULL AS varchar),
CAST(NULL AS varchar)
WHERE NOT EXISTS (
    SELECT 1 FROM xdat_search.prearchive
    WHERE timestamp = '20240301_000000001'
      AND foldername = 'PAT002_20221003_MR'
      AND project IS NOT DISTINCT FROM 'prj001')
  AND NOT EXISTS (
    SELECT 1 FROM xdat_search.prearchive
    WHERE project IS NOT DISTINCT FROM 'prj001'
      AND tag = '2.25.274211555748246625924881240087185146790'
      AND name = 'PAT002_20221003_MR');

COMMIT;
