/* unit-main.h - the end of every unit test's main(): run the suite, and
 * exit with failure when any check failed. */
#ifndef XNBD_UNIT_MAIN_H
#define XNBD_UNIT_MAIN_H

#include <check.h>
#include <stdlib.h>

static inline int xnbd_test_run(Suite *s)
{
	SRunner *sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

#endif
