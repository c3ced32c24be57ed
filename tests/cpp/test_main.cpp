// The Catch2 v2 main for the C++ tests.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
