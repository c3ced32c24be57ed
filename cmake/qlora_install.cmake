# Installs the core as a CMake package: headers under include/qlora, libqlora_core.a, and a
# config so that find_package(qlora) gives the imported target qlora::core (Threads included).
# Included from the top-level CMakeLists.txt when QLORA_INSTALL_CPP is on (never for the wheel).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(_qlora_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/qlora)
set_target_properties(qlora_core PROPERTIES EXPORT_NAME core)
install(TARGETS qlora_core EXPORT qloraTargets ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/csrc/include/qlora DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT qloraTargets NAMESPACE qlora:: DESTINATION ${_qlora_cmake_dir})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/qloraConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/qloraConfig.cmake INSTALL_DESTINATION ${_qlora_cmake_dir})
# 0.x releases may change the C++ API between minor versions.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/qloraConfigVersion.cmake
                                 VERSION ${QLORA_VERSION_STRING} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/qloraConfig.cmake ${PROJECT_BINARY_DIR}/qloraConfigVersion.cmake
        DESTINATION ${_qlora_cmake_dir})
